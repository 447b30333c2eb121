"""The `hub` group: uploading the result to the Hugging Face Hub.

Standard library only: `--cfg job` must not pay for torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from qwenvl_ft.errors import check as _check


# A Hub repository id: "name" (under the logged-in user) or "owner/name"; the Hub's own rule, checked here so that a
# typo fails at compose time rather than after training.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class HubConfig:
    """Uploading the result to the Hugging Face Hub: `final/` after `qwenvl-ft train`, `merged/` after `qwenvl-ft
    merge` (model card included). Authentication is huggingface_hub's own: `hf auth login` or HF_TOKEN."""

    push: bool = False  # upload after the command finished (a failed upload leaves everything saved in place)
    repo_id: Optional[str] = None  # "name" or "owner/name"; created when missing
    private: bool = True  # visibility of a repository created by the push (an existing one keeps its own)
    revision: Optional[str] = None  # branch to commit to (None: main)
    commit_message: Optional[str] = None  # None: "qwenvl-ft: <run folder>"

    def __post_init__(self) -> None:
        _check(not self.push or self.repo_id is not None, "hub.push=true needs hub.repo_id=NAME or OWNER/NAME")
        _check(self.repo_id is None or (len(self.repo_id) <= 96 and bool(_REPO_ID.match(self.repo_id))
                                        and ".." not in self.repo_id and "--" not in self.repo_id),
               f"hub.repo_id={self.repo_id!r} is not a Hub repository id (NAME or OWNER/NAME: letters, digits, "
               f"'-', '_', '.', at most 96 characters)")
