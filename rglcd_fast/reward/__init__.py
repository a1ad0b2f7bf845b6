"""Reward models: the expert (pixel-space) adapters and the latent proxy reward model (LRM)."""

from .base import RewardModel, preprocess
from .experts import (
    REWARD_MODELS,
    AestheticLinearHead,
    AestheticMLPHead,
    AestheticMLPScore,
    AestheticScore,
    ClipScore,
    HPSv2,
    ImageReward,
    PickScore,
    WeightedReward,
    load_reward_model,
)
from .lrm import LatentImageEncoder, LatentRewardModel

__all__ = [
    "RewardModel",
    "preprocess",
    "ClipScore",
    "PickScore",
    "AestheticLinearHead",
    "AestheticMLPHead",
    "AestheticScore",
    "AestheticMLPScore",
    "HPSv2",
    "ImageReward",
    "WeightedReward",
    "REWARD_MODELS",
    "load_reward_model",
    "LatentRewardModel",
    "LatentImageEncoder",
]
