"""The Hugging Face Hub from a run's side: the token an upload uses, and whether the hub answers, asked before work.

token = hub.token_for("--push_to_hub")      # refuses in one line when there is none
hub.check_reachable("push_to_hub", token)   # refuses in one line when offline or unreachable
"""

from __future__ import annotations

from tunefleet.common.errors import TunefleetError, first_line


def token_for(what: str) -> str:
    """The token an upload with `what` would use; one line naming how to give one when there is none."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise TunefleetError(f"{what} needs a Hugging Face token: set HF_TOKEN or run `hf auth login`, then rerun")
    return token


def check_reachable(what: str, token: str) -> None:
    """Ask the hub who the token belongs to: offline mode, an unreachable hub or a refused token is one line."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise TunefleetError(f"{what}: the hub is off here (HF_HUB_OFFLINE is set): unset it, or remove {what}")
    try:
        HfApi(token=token).whoami()
    except Exception as exc:  # httpx's connection errors and the hub's HTTP errors alike: say which, once
        raise TunefleetError(
            f"{what}: the hub at {constants.ENDPOINT} did not accept this token or did not answer "
            f"({first_line(exc)}); fix the token or the network, or remove {what}"
        ) from None
