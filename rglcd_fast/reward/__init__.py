"""Reward models: the expert (pixel-space) adapters and the latent proxy reward model (LRM)."""
from .base import RewardModel, preprocess
from .experts import (REWARD_MODELS, AestheticHead, AestheticScore, ClipScore, HPSv2, ImageReward, PickScore,
                      load_reward_model)
from .lrm import LatentImageEncoder, LatentRewardModel

__all__ = ["RewardModel", "preprocess", "ClipScore", "PickScore", "AestheticHead", "AestheticScore", "HPSv2",
           "ImageReward", "REWARD_MODELS", "load_reward_model", "LatentRewardModel", "LatentImageEncoder"]
