"""Pure reward math for speech RL, importable without torch or a server.

>>> from speechrl.rewards import error_rates, rule_rewards
>>> round(error_rates("the cat sat", "The cat sat.").wer, 3)
0.0
>>> rule_rewards("the the the the the the", "the cat").hallucination_reward
-1.0
"""

from speechrl.rewards.asr_rules import RuleRewardConfig, RuleRewardResult, rule_rewards
from speechrl.rewards.mappings import SIMILARITY_MAPPINGS, WER_MAPPINGS, similarity_reward, wer_reward
from speechrl.rewards.text import is_character_language, normalize_text
from speechrl.rewards.tts import diversity_rewards, duration_rewards, edit_distance, f0_std, f0_track
from speechrl.rewards.wer import ErrorRates, error_rates

__all__ = [
    "ErrorRates", "RuleRewardConfig", "RuleRewardResult", "SIMILARITY_MAPPINGS", "WER_MAPPINGS",
    "diversity_rewards", "duration_rewards", "edit_distance", "error_rates", "f0_std", "f0_track",
    "is_character_language", "normalize_text", "rule_rewards", "similarity_reward", "wer_reward",
]
