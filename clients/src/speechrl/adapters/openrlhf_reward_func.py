"""The file to give OpenRLHF as `--reward.remote_url`: it only re-exports `reward_func`.

OpenRLHF loads a reward file with importlib's spec_from_file_location and never registers it in
sys.modules, so a dataclass (or anything that looks its module up) defined in that file fails to
build; the logic therefore lives in the importable module speechrl.adapters.openrlhf.

    --reward.remote_url $(python -c "import speechrl.adapters.openrlhf_reward_func as m; print(m.__file__)")
"""

from speechrl.adapters.openrlhf import reward_func

__all__ = ["reward_func"]
